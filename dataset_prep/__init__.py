"""Making dataset archives (dataset_tool.py): image sources, the demo shapes, archives."""
