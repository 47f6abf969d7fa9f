"""Backend adapters: the contract (base), the registry, and the built-in implementations."""
