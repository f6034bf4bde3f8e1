"""How pixel values are normalised between the data pipeline and the image encoders (a leaf, no imports).

trainer.data.pictures (through trainer.data.decode.decode_image) turns a picture's [0, 1] values into
(p - PIXEL_MEAN) / PIXEL_STD for every encoder; a pretrained backbone (trainer.models.image_towers'
EfficientNet-Lite0) maps that to its own normalisation.
"""
PIXEL_MEAN, PIXEL_STD = 0.5, 0.25
