"""realm_jax: REALM (Guu et al. 2020) in JAX/Flax — retriever, knowledge-augmented encoder,
ORQA reader, sharded training and an asynchronously refreshed index."""

__version__ = "0.1.0"
