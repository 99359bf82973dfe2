"""Registration of fastdf ops in third-party interfaces (HF transformers)."""
