"""The miniature offline CLIP world: procedural tasks, a small pretrained CLIP, fine-tuned encoders."""
