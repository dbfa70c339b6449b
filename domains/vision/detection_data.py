"""Deprecated module (releases up to 0.1.0 named it in class paths): `polyformer.domains.vision.detection.data` holds it
now. Checkpoints and configs that name `polyformer.domains.vision.detection_data.<Class>` still load, with a deprecation
message; this module goes in the next release."""

import warnings

from polyformer.domains.vision.detection.data import *  # noqa: F401,F403  (the moved module's public names)

warnings.warn("polyformer.domains.vision.detection_data is deprecated: import polyformer.domains.vision.detection "
              "(class paths polyformer.domains.vision.detection.<Class>)", DeprecationWarning, stacklevel=2)
