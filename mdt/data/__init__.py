"""Data: image inputs, class index, ADM preprocessing, latent shards (writer, reader), manifest."""
