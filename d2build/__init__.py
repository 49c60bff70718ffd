"""d2build: declarative builds of Detectron2 detection models into TensorRT-ready graphs and engines."""

__version__ = "0.1.0"
