"""The catalogue: every registered method lives in one module of this package.

Importing the package imports each module in it, sub-packages included (each
registers its classes with ``@register``), so adding a method is adding a
file: there is no list to edit.
"""

import importlib
import pkgutil

for _module in pkgutil.walk_packages(__path__, prefix=f"{__name__}."):
    importlib.import_module(_module.name)
