"""Suite-specific tables: each module registers its functions with harness.report.table; all are imported here."""
import importlib
import pkgutil

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")
