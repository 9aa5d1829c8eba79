# Run by the postgres image on the first start (sourced from /docker-entrypoint-initdb.d):
# creates Retain's roles and databases (init.sql) with the passwords compose passes in.
# Tested against a real cluster by tests/ops/test_postgres_init.py.
psql -X -v ON_ERROR_STOP=1 --username "${POSTGRES_USER:-postgres}" --dbname postgres \
  -v retain_password="${RETAIN_DB_PASSWORD:-retain}" \
  -v grafana_password="${RETAIN_GRAFANA_KPI_DB_PASSWORD:-grafana_reader}" \
  -f "${RETAIN_INIT_SQL:-/etc/retain/init.sql}"
