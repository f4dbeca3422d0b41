"""The backbone token cache: frozen backbones run once, tokens kept on disk, found again per sample."""
