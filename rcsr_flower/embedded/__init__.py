"""The embedded offline benchmark: the generated image-caption corpus and its
rendering, the tiny CLIP pretrained on a shifted corpus, and the assets cache."""
