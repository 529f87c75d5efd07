"""Config, SimMIM models on timm encoders, the training loop, checkpoints and the CLI."""
