"""PostgresMessageStore specifics: lazy import, unreachable servers, setup, pools."""

from __future__ import annotations

import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator

import pytest
from langchain_core.messages import HumanMessage

from langchain_holysheep.stores import SchemaVersionError, StoreUnavailableError
from langchain_holysheep.stores.base import mask_password
from tests.postgres_server import PostgresServer


def _python(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )


def test_importing_the_stores_does_not_import_psycopg() -> None:
    result = _python(
        "import sys, langchain_holysheep, langchain_holysheep.stores\n"
        "from langchain_holysheep.stores import SQLiteMessageStore, InMemoryMessageStore\n"
        "print('psycopg' in sys.modules, 'psycopg_pool' in sys.modules)"
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["False", "False"]


@pytest.mark.parametrize(
    "statement",
    [
        "from langchain_holysheep.stores import PostgresMessageStore",
        "from langchain_holysheep import PostgresMessageStore",
    ],
)
def test_missing_psycopg_names_the_extra(statement: str) -> None:
    result = _python(f"import sys\nsys.modules['psycopg'] = None\n{statement}\n")
    assert result.returncode != 0
    assert "ImportError" in result.stderr
    assert 'pip install "langchain-holysheep[postgres]"' in result.stderr


def test_mask_password() -> None:
    assert (
        mask_password("postgresql://app:s3cr%40t@db.example:5432/app?sslmode=require")
        == "postgresql://app:***@db.example:5432/app?sslmode=require"
    )
    assert mask_password("host=db user=app password=s3cret dbname=app") == (
        "host=db user=app password=*** dbname=app"
    )
    assert (
        mask_password("host=db password='a b\\' c' dbname=app") == "host=db password=*** dbname=app"
    )
    assert mask_password("postgresql://app@db/app") == "postgresql://app@db/app"


@pytest.fixture
def dead_url() -> str:
    import socket

    with socket.socket() as sock:  # a loopback port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"postgresql://app:s3cret@127.0.0.1:{port}/app"


def test_unreachable_server_fails_with_masked_url(dead_url: str) -> None:
    from langchain_holysheep.stores import PostgresMessageStore

    store = PostgresMessageStore(dead_url, connect_timeout=2)
    masked = dead_url.replace("s3cret", "***")
    with pytest.raises(StoreUnavailableError, match="nothing was written") as info:
        store.append("s", [HumanMessage("hi")], [1])
    assert masked in str(info.value)
    assert "s3cret" not in str(info.value)
    assert "s3cret" not in repr(store)
    with pytest.raises(StoreUnavailableError):
        store.read("s")
    store.close()


async def test_unreachable_server_fails_async(dead_url: str) -> None:
    from langchain_holysheep.stores import PostgresMessageStore

    store = PostgresMessageStore(dead_url, connect_timeout=2)
    with pytest.raises(StoreUnavailableError, match=r"app:\*\*\*@127\.0\.0\.1") as info:
        await store.aappend("s", [HumanMessage("hi")], [1])
    assert "s3cret" not in str(info.value)
    await store.aclose()


@pytest.fixture
def fresh_database(postgres_server: PostgresServer) -> Iterator[str]:
    import psycopg

    name = f"db_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(postgres_server.url, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    yield postgres_server.url.rsplit("/", 1)[0] + "/" + name
    with psycopg.connect(postgres_server.url, autocommit=True) as conn:
        conn.execute(f"DROP DATABASE {name} WITH (FORCE)")


@pytest.mark.postgres
def test_concurrent_setup_is_idempotent(fresh_database: str) -> None:
    import psycopg

    from langchain_holysheep.stores import PostgresMessageStore
    from langchain_holysheep.stores.postgres import SCHEMA_VERSION

    stores = [PostgresMessageStore(fresh_database) for _ in range(6)]
    barrier = threading.Barrier(len(stores))
    errors: list[BaseException] = []

    def setup(store: PostgresMessageStore) -> None:
        barrier.wait()
        try:
            store.setup()
            store.setup()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=setup, args=(s,)) for s in stores]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    with psycopg.connect(fresh_database) as conn:
        rows = conn.execute("SELECT version FROM holysheep_schema_version ORDER BY 1").fetchall()
    assert rows == [(v,) for v in range(1, SCHEMA_VERSION + 1)]
    assert stores[0].append("s", [HumanMessage("x")], [1]) == [0]
    for store in stores:
        store.close()


@pytest.mark.postgres
def test_newer_schema_is_refused(fresh_database: str) -> None:
    import psycopg

    from langchain_holysheep.stores import PostgresMessageStore

    PostgresMessageStore(fresh_database).setup()
    with psycopg.connect(fresh_database, autocommit=True) as conn:
        conn.execute("INSERT INTO holysheep_schema_version (version) VALUES (42)")
    with pytest.raises(SchemaVersionError, match="schema version 42"):
        PostgresMessageStore(fresh_database).get_session("s")


@pytest.mark.postgres
async def test_context_managers_and_given_pools(postgres_server: PostgresServer) -> None:
    from psycopg_pool import AsyncConnectionPool, ConnectionPool

    from langchain_holysheep.stores import PostgresMessageStore

    ns = f"ns-{uuid.uuid4().hex[:8]}"
    with PostgresMessageStore.from_conn_string(postgres_server.url, namespace=ns) as store:
        assert store.append("s", [HumanMessage("sync")], [1]) == [0]
    async with PostgresMessageStore.afrom_conn_string(postgres_server.url, namespace=ns) as store:
        assert await store.aappend("s", [HumanMessage("async")], [1]) == [1]
    kwargs = {"autocommit": True}
    with ConnectionPool(postgres_server.url, kwargs=kwargs, min_size=1, open=True) as pool:
        async with AsyncConnectionPool(
            postgres_server.url, kwargs=kwargs, min_size=1, open=False
        ) as apool:
            store = PostgresMessageStore(pool=pool, async_pool=apool, namespace=ns)
            assert [m.message.content for m in store.read("s")] == ["sync", "async"]
            assert [m.seq for m in await store.aread("s")] == [0, 1]
            store.close()
            await store.aclose()  # given pools stay open: they belong to the caller
            assert not pool.closed
            assert await store.aappend("s", [HumanMessage("more")], [1]) == [2]
