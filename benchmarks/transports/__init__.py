"""The implementations under test, one module per transport family; see ``base``."""

__all__: list[str] = []
