"""Teacher names with timm pretrained tags, the Wide ResNet bottleneck, and the teacher's normalisation (offline)."""

from pathlib import Path

import pytest
import timm
import torch
from anomalib.models.components.backbone.resnet_decoder import ResNetDecoder
from anomalib.models.image.reverse_distillation.components.bottleneck import OCBE
from anomalib.pre_processing import PreProcessor
from torchvision.transforms.v2 import Compose, Normalize, Resize

from anomalib_aand import Aand, AandModel
from anomalib_aand.components.checkpoints import check_checkpoint
from anomalib_aand.components.student import build_student
from anomalib_aand.components.teacher import (
    TeacherError,
    load_teacher_weights,
    split_backbone,
    teacher_normalization,
)

RESNET_LAYERS = ("layer1", "layer2", "layer3")
LITE0_LAYERS = ("blocks.1", "blocks.2", "blocks.4")
IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


def resnet18_model(backbone: str) -> AandModel:
    return AandModel(backbone, RESNET_LAYERS, num_keys=50, gate_temperature=0.2)


def _normalize(model: Aand) -> Normalize:
    return next(t for t in model.pre_processor.transform.transforms if isinstance(t, Normalize))


def _parameters(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("wide_resnet50_2.tv_in1k", ("wide_resnet50_2", "tv_in1k")),
        ("resnet18.tv_in1k", ("resnet18", "tv_in1k")),
        ("wide_resnet50_2", ("wide_resnet50_2", "")),
        ("tf_efficientnet_lite0.in1k", ("tf_efficientnet_lite0", "in1k")),
    ],
)
def test_tag_parsing(name: str, expected: tuple[str, str]) -> None:
    assert split_backbone(name) == expected


def test_unknown_tag_names_the_known_ones() -> None:
    with pytest.raises(TeacherError, match=r"no pretrained tag 'nope'.*resnet18\.tv_in1k"):
        split_backbone("resnet18.nope")
    with pytest.raises(TeacherError, match="no pretrained tag"):
        resnet18_model("resnet18.nope")


def test_tagged_name_builds_the_bare_names_model_and_student() -> None:
    tagged, bare = resnet18_model("resnet18.tv_in1k"), resnet18_model("resnet18")
    assert isinstance(tagged.bottleneck, OCBE)
    assert isinstance(tagged.decoder, ResNetDecoder)
    assert _parameters(tagged) == _parameters(bare)
    shapes = {key: value.shape for key, value in bare.state_dict().items()}
    assert {key: value.shape for key, value in tagged.state_dict().items()} == shapes
    images = torch.rand(1, 3, 64, 64)
    assert [f.shape for f in tagged.extract(images)] == [f.shape for f in bare.extract(images)]


def test_wide_resnet_bottleneck_has_the_authors_width() -> None:
    """67,277,824 parameters: the authors' (and RD4AD's) BN_layer for Wide ResNet-50 (width_per_group=128)."""
    channels, reductions = [256, 512, 1024], [4, 8, 16]
    bottleneck, decoder = build_student("wide_resnet50_2.tv_in1k", RESNET_LAYERS, channels, reductions)
    assert _parameters(bottleneck) == 67_277_824
    assert isinstance(decoder, ResNetDecoder)
    bare, _ = build_student("wide_resnet50_2", RESNET_LAYERS, channels, reductions)
    assert _parameters(bare) == 67_277_824
    narrow, _ = build_student("resnet50", RESNET_LAYERS, channels, reductions)
    assert _parameters(narrow) < 67_277_824  # plain ResNets keep width 64


def test_tagged_backbone_loads_a_local_weight_file(tmp_path: Path) -> None:
    """The tag does not change which tensors a weight file must hold (offline: backbone_weights)."""
    path = tmp_path / "resnet18.pth"
    state = timm.create_model("resnet18", pretrained=False).state_dict()
    torch.save(state, path)
    model = resnet18_model("resnet18.tv_in1k")
    load_teacher_weights(model.teacher, "resnet18.tv_in1k", path)
    loaded = model.teacher.feature_extractor.state_dict()
    assert all(torch.equal(loaded[key], state[key]) for key in loaded)


def test_checkpoint_of_the_bare_name_fits_the_tagged_model() -> None:
    """The tag only chose the initial weights, which the checkpoint holds: no refusal."""
    settings = {"layers": RESNET_LAYERS, "stage1_epochs": 1, "stage2_epochs": 1, "pre_trained": False}
    bare, tagged = Aand(backbone="resnet18", **settings), Aand(backbone="resnet18.tv_in1k", **settings)
    checkpoint = {"state_dict": bare.state_dict(), "hyper_parameters": dict(bare.hparams)}
    check_checkpoint(checkpoint, tagged.state_dict(), tagged.hparams)
    other = Aand(backbone="resnet34.tv_in1k", **settings)
    with pytest.raises(ValueError, match="backbone: checkpoint 'resnet18', this model 'resnet34'"):
        check_checkpoint(checkpoint, other.state_dict(), other.hparams)


def test_teacher_normalization_from_timm() -> None:
    assert teacher_normalization("tf_efficientnet_lite0") == ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    assert teacher_normalization("wide_resnet50_2.tv_in1k") == IMAGENET


def test_normalization_argument_sets_the_default_pre_processor() -> None:
    settings = {"layers": LITE0_LAYERS, "stage1_epochs": 1, "stage2_epochs": 1, "pre_trained": False}
    imagenet = Aand(backbone="tf_efficientnet_lite0", **settings)
    assert (tuple(_normalize(imagenet).mean), tuple(_normalize(imagenet).std)) == IMAGENET
    teacher = Aand(backbone="tf_efficientnet_lite0", normalization="teacher", **settings)
    assert tuple(_normalize(teacher).mean) == (0.5, 0.5, 0.5)
    assert tuple(_normalize(teacher).std) == (0.5, 0.5, 0.5)
    assert teacher.input_size == imagenet.input_size == (256, 256)
    sized = Aand.configure_pre_processor((128, 128), backbone="tf_efficientnet_lite0", normalization="teacher")
    assert any(isinstance(t, Resize) and list(t.size) == [128, 128] for t in sized.transform.transforms)


def test_a_given_pre_processor_is_left_alone() -> None:
    given = PreProcessor(transform=Compose([Resize((64, 64)), Normalize(mean=[0.1] * 3, std=[0.2] * 3)]))
    model = Aand(
        backbone="tf_efficientnet_lite0",
        layers=LITE0_LAYERS,
        normalization="teacher",
        pre_processor=given,
        stage1_epochs=1,
        stage2_epochs=1,
    )
    assert model.pre_processor is given
    assert tuple(_normalize(model).mean) == (0.1, 0.1, 0.1)


def test_unknown_normalization_is_refused() -> None:
    with pytest.raises(ValueError, match="normalization must be 'imagenet' or 'teacher'"):
        Aand(backbone="resnet18", normalization="tf")
    with pytest.raises(ValueError, match="normalization must be 'imagenet' or 'teacher', or a mapping"):
        Aand(backbone="resnet18", normalization={"grass": "tf"})


@pytest.mark.slow
def test_normalization_per_category_re_normalises_the_teacher_input_for_its_category(
    mvtec_root: Path, tmp_path: Path
) -> None:
    """A mapping keeps the pre-processor's ImageNet statistics; when training starts, the datamodule's category
    chooses: ``teacher`` makes the teacher see Lite0's 0.5 / 0.5 normalisation, another category the pre-processor's.
    The choice travels in the checkpoint; a plain model refuses it, naming the setting."""
    from anomalib.data import MVTecAD
    from anomalib.engine import Engine
    from conftest import tiny_aand

    from anomalib_aand.components.errors import AandInputError

    datamodule = MVTecAD(root=mvtec_root, category="toy", train_batch_size=4, eval_batch_size=4, num_workers=0)
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    imagenet = (images - torch.tensor(IMAGENET[0]).view(1, 3, 1, 1)) / torch.tensor(IMAGENET[1]).view(1, 3, 1, 1)
    checkpoints = {}
    for setting, expected in (
        ({"toy": "teacher", "default": "imagenet"}, (images - 0.5) / 0.5),
        ({"x": "teacher"}, imagenet),
    ):
        model = tiny_aand(backbone="tf_efficientnet_lite0", layers=LITE0_LAYERS, normalization=setting)
        assert tuple(_normalize(model).mean) == IMAGENET[0]
        engine = Engine(default_root_dir=tmp_path / str(len(checkpoints)), logger=False, enable_progress_bar=False)
        engine.fit(model, datamodule=datamodule)
        checkpoints[len(checkpoints)] = engine.trainer.checkpoint_callback.best_model_path
        model.eval()
        with torch.no_grad():
            seen = model.model.extract(imagenet)
            wanted = list(model.model.teacher(expected).values())
        for ours, theirs in zip(seen, wanted, strict=True):
            torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)
    reloaded = Aand.load_from_checkpoint(checkpoints[0], map_location="cpu")
    torch.testing.assert_close(reloaded.model.teacher_input_scale.flatten(), torch.tensor(IMAGENET[1]) / 0.5)
    plain = tiny_aand(backbone="tf_efficientnet_lite0", layers=LITE0_LAYERS)
    with pytest.raises(AandInputError, match="normalization per category: checkpoint True, this model False"):
        Engine(default_root_dir=tmp_path, logger=False).test(plain, datamodule=datamodule, ckpt_path=checkpoints[0])
