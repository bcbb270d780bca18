"""Building blocks of AAND."""
