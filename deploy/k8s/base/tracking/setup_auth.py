"""Prepare MLflow's user store before the server starts (the MLflow pod's init container).

Creates the auth database on PostgreSQL when it is missing, migrates it, and creates the jobs'
MLflow user (or resets its password to the Secret's) from MLFLOW_TRACKING_USERNAME and
MLFLOW_TRACKING_PASSWORD, as a plain user: it manages what it creates and reads the rest. The
admin user is the server's own business (MLFLOW_AUTH_ADMIN_USERNAME / _PASSWORD). Safe to run
in several replicas at once and on every start.
"""

from __future__ import annotations

import os
import sys

import sqlalchemy
from mlflow.exceptions import MlflowException
from mlflow.server.auth.config import read_auth_config
from mlflow.server.auth.sqlalchemy_store import SqlAlchemyStore


def ensure_database(uri: str) -> None:
    """CREATE DATABASE for a PostgreSQL URI whose database does not exist yet."""
    url = sqlalchemy.engine.make_url(uri)
    if not url.drivername.startswith("postgresql"):
        return
    server = sqlalchemy.create_engine(url.set(database="postgres"), isolation_level="AUTOCOMMIT")
    try:
        with server.connect() as conn:
            found = conn.execute(sqlalchemy.text("SELECT 1 FROM pg_database WHERE datname = :name"),
                                 {"name": url.database}).scalar()
            if not found:
                try:
                    conn.execute(sqlalchemy.text(f'CREATE DATABASE "{url.database}"'))
                except sqlalchemy.exc.ProgrammingError:
                    pass  # another replica created it in the meantime
    finally:
        server.dispose()


def ensure_user(store: SqlAlchemyStore, username: str, password: str) -> str:
    if not store.has_user(username):
        try:
            store.create_user(username, password)
            return "created"
        except MlflowException:
            pass  # another replica created it in the meantime
    changed = []
    if not store.authenticate_user(username, password):
        store.update_user(username, password=password)
        changed.append("password")
    if store.get_user(username).is_admin:
        store.update_user(username, is_admin=False)
        changed.append("admin flag removed")
    return f"updated ({', '.join(changed)})" if changed else "unchanged"


def main() -> int:
    username = os.environ.get("MLFLOW_TRACKING_USERNAME", "")
    password = os.environ.get("MLFLOW_TRACKING_PASSWORD", "")
    if not username or not password:
        print("MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD must be set", file=sys.stderr)
        return 2
    config = read_auth_config()
    if username == config.admin_username:
        print(f"the jobs' MLflow user must not be the admin ({username})", file=sys.stderr)
        return 2
    ensure_database(config.database_uri)
    store = SqlAlchemyStore()
    store.init_db(config.database_uri)
    print(f"MLflow user {username}: {ensure_user(store, username, password)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
