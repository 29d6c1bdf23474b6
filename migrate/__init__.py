"""migrate-hub-module: TF1 Hub image modules -> verified TF2 Reusable SavedModels."""

# The one version source: setup.cfg reads it (`version = attr:`), the
# converted models' metadata and model cards carry it.
__version__ = "0.1.0"
