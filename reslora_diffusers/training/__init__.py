"""Helpers of ``train_text_to_image.py``: image-caption data, checkpoints and the model card."""
