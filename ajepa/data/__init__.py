"""Datasets: the embedded generator, manifests, the spectrogram front end and the feature store."""
