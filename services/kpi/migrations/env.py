from services.kpi.tables import metadata
from shared.alembic_env import run

run(metadata)
