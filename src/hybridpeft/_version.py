"""The package version, in a module of its own: importing it runs nothing else of hybridpeft
(``api`` stamps it into saved adapters without importing the package root)."""
__version__ = "0.1.0"
