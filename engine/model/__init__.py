"""The model library: backbones, fusion encoder, query and item towers, model folders, image loading, serving graphs."""
