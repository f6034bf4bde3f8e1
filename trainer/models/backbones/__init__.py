"""Pretrained image backbones in plain torch (no torchvision, no timm), loading published state dicts."""
