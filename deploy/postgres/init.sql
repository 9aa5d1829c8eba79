-- Retain on PostgreSQL 16: one database per service, created once, when the data volume is
-- empty: the postgres image runs init.sh, which runs this file with psql as POSTGRES_USER and
-- the two passwords as psql variables (from RETAIN_DB_PASSWORD and
-- RETAIN_GRAFANA_KPI_DB_PASSWORD; quoted by psql, never spliced into the SQL by hand).
--
-- Each service owns its database and creates its own tables (Alembic, on start-up): the
-- segmenter, messenger and kpi never share tables and never read each other's databases.
-- Ingest has no database.
--
--   retain          the services' role, owner of the three databases (PostgreSQL 15+ lets
--                   a database's owner create in its public schema; it is not a superuser)
--   grafana_reader  Grafana's role for the Retention KPIs dashboard: CONNECT on kpi only and
--                   SELECT on its tables, never the service's own role
--
-- Without the variables (psql -f init.sql by hand) the passwords are the local ones, retain and
-- grafana_reader. They are set on the first start only: to change them later, ALTER ROLE …
-- PASSWORD … and set the same value where compose reads it. In production, better still, a
-- role per service with its own password.

\set ON_ERROR_STOP on
\if :{?retain_password}
\else
\set retain_password retain
\endif
\if :{?grafana_password}
\else
\set grafana_password grafana_reader
\endif

CREATE ROLE retain LOGIN PASSWORD :'retain_password';
CREATE ROLE grafana_reader LOGIN PASSWORD :'grafana_password';

CREATE DATABASE segmenter OWNER retain;
CREATE DATABASE messenger OWNER retain;
CREATE DATABASE kpi OWNER retain;

-- Every role may connect to every database by default (PUBLIC); only the owner may here.
REVOKE CONNECT, TEMPORARY ON DATABASE segmenter FROM PUBLIC;
REVOKE CONNECT, TEMPORARY ON DATABASE messenger FROM PUBLIC;
REVOKE CONNECT, TEMPORARY ON DATABASE kpi FROM PUBLIC;
GRANT CONNECT ON DATABASE kpi TO grafana_reader;

-- Grafana reads the kpi tables that the kpi service creates later (as retain), so the grant
-- is a default privilege of tables retain creates in kpi's public schema.
\connect kpi
GRANT USAGE ON SCHEMA public TO grafana_reader;
ALTER DEFAULT PRIVILEGES FOR ROLE retain IN SCHEMA public GRANT SELECT ON TABLES TO grafana_reader;
