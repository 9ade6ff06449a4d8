"""The tensor side: the spectrogram front end, the feature store, and the data loaders over it."""
