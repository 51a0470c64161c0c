"""Imports every domain's models so that ``Base.metadata`` knows all tables (migrations, tests)."""

from duecourse.campaigns import models as campaigns  # noqa: F401
from duecourse.channels import models as channels  # noqa: F401
from duecourse.engine import models as engine  # noqa: F401
from duecourse.events import models as events  # noqa: F401
from duecourse.ledger import models as ledger  # noqa: F401
from duecourse.messaging import models as messaging  # noqa: F401
from duecourse.strategies import models as strategies  # noqa: F401
from duecourse.tenancy import models as tenancy  # noqa: F401
from duecourse.db.base import Base

metadata = Base.metadata
