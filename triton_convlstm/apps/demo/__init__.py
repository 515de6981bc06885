"""``python -m triton_convlstm demo``: an encoder-forecaster (:mod:`.nowcast_model`) trained on
moving digits generated on the fly (:mod:`.moving_digits`) by :mod:`.command`."""
