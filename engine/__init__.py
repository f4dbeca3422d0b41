"""ecsearch engine: backbones, gated cross-modal fusion, query and item towers, training, evaluation."""
