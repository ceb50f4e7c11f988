"""A toy world for offline demos and tests: seeded synthetic scenes (`scenes`) and the
training script of the bundled `gemlabel-toy` model (`train`). Not a real CLIP."""
