"""The DiT local-attention trainer: a library with no Ray and no MLflow in it."""
