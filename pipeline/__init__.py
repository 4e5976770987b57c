"""Stage one of zeroseg: image sources, crop geometry, the CLIP teacher and the feature store."""
