from services.segmenter.tables import metadata
from shared.alembic_env import run

run(metadata)
