"""`appliance webhooks create|list|enable|disable|delete|deliveries`: the same functions as
`/v1/webhooks`.

`create … --json` prints `{"id", "secret", …}`; the secret signs every delivery and is shown once.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import click
import msgspec

from appliance.cli.common import cli_config, run_async
from appliance.resources import Conn, direct_connection
from appliance.webhooks import endpoints, log
from appliance.webhooks.events import EVENT_TYPES

T = TypeVar("T")


def _validated(fields: dict[str, Any], kind: type[T]) -> T:
    """`fields` checked by the same struct (and rules) as the HTTP API's body."""
    try:
        return msgspec.convert(fields, kind)
    except msgspec.ValidationError as exc:
        raise click.UsageError(str(exc)) from None


def _with_conn(work: Callable[[Conn], Awaitable[T]]) -> T:
    config = cli_config()

    async def run() -> T:
        async with direct_connection(config, "cli")() as conn:
            return await work(conn)

    return run_async(run())


def _print(webhook: endpoints.Webhook, as_json: bool) -> None:
    if as_json:
        click.echo(msgspec.json.encode(webhook))
        return
    for name, value in msgspec.structs.asdict(webhook).items():
        if value is not None:
            click.echo(f"{name:16} {', '.join(value) if isinstance(value, list) else value}")


@click.group("webhooks")
def webhooks_group() -> None:
    """Webhook endpoints: create (secret shown once), list, enable, disable, delete, deliveries."""


@webhooks_group.command("create")
@click.option("--url", required=True, help="http(s) URL the events are POSTed to.")
@click.option(
    "--event", "events", multiple=True, required=True, type=click.Choice(EVENT_TYPES),
    help="Repeat for several event types.",
)  # fmt: skip
@click.option("--description", default=None)
@click.option("--json", "as_json", is_flag=True, help="Print JSON (with the secret) for scripts.")
def create(url: str, events: tuple[str, ...], description: str | None, as_json: bool) -> None:
    """Register an endpoint. Its signing secret is printed once and cannot be shown again."""
    spec = _validated(
        {"url": url, "events": list(events), "description": description}, endpoints.WebhookCreate
    )
    config = cli_config()

    async def work(conn: Conn) -> endpoints.CreatedWebhook:
        return await endpoints.create(conn, spec, allow_private=config.webhooks.allow_private)

    _print(_with_conn(work), as_json)
    if not as_json:
        click.echo("Store the secret now: it is not shown again.", err=True)


@webhooks_group.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON array.")
def list_cmd(as_json: bool) -> None:
    """List endpoints (never their secrets)."""
    found = _with_conn(endpoints.list_all)
    if as_json:
        click.echo(msgspec.json.encode(found))
        return
    for hook in found:
        state = "enabled" if hook.enabled else f"disabled ({hook.disabled_reason})"
        click.echo(
            f"{hook.id}  {state:22} failures {hook.failures:<4} {','.join(hook.events):40} "
            f"{hook.url}"
        )


def _set_enabled(webhook_id: str, enabled: bool, as_json: bool) -> None:
    spec = endpoints.WebhookPatch(enabled=enabled)

    async def work(conn: Conn) -> endpoints.Webhook:
        return await endpoints.update(conn, webhook_id, spec, allow_private=True)

    _print(_with_conn(work), as_json)


@webhooks_group.command("enable")
@click.argument("webhook_id")
@click.option("--json", "as_json", is_flag=True)
def enable(webhook_id: str, as_json: bool) -> None:
    """Enable WEBHOOK_ID again (after failures or an admin's disable); resets its failure count."""
    _set_enabled(webhook_id, True, as_json)


@webhooks_group.command("disable")
@click.argument("webhook_id")
@click.option("--json", "as_json", is_flag=True)
def disable(webhook_id: str, as_json: bool) -> None:
    """Disable WEBHOOK_ID: events are no longer queued for it, queued deliveries are dropped."""
    _set_enabled(webhook_id, False, as_json)


@webhooks_group.command("delete")
@click.argument("webhook_id")
@click.option("--json", "as_json", is_flag=True)
def delete(webhook_id: str, as_json: bool) -> None:
    """Delete WEBHOOK_ID and its delivery log."""

    async def work(conn: Conn) -> endpoints.Webhook:
        return await endpoints.delete(conn, webhook_id)

    _print(_with_conn(work), as_json)


@webhooks_group.command("deliveries")
@click.argument("webhook_id")
@click.option("--limit", default=log.DEFAULT_LIMIT, show_default=True, type=int)
@click.option("--cursor", default=None, help="next_cursor of the previous page.")
@click.option("--json", "as_json", is_flag=True, help="Print the page as JSON.")
def deliveries(webhook_id: str, limit: int, cursor: str | None, as_json: bool) -> None:
    """Delivery attempts of WEBHOOK_ID, newest first."""

    async def work(conn: Conn) -> log.Page:
        await endpoints.get(conn, webhook_id)
        return await log.page(conn, webhook_id, cursor, limit)

    found = _with_conn(work)
    if as_json:
        click.echo(msgspec.json.encode(found))
        return
    for a in found.deliveries:
        status = "-" if a.status is None else str(a.status)
        click.echo(
            f"{a.at:%Y-%m-%d %H:%M:%S}  {a.delivery}  #{a.attempt:<3} {a.outcome:11} {status:4} "
            f"{a.event_count:>4} events  {a.duration_ms:8.1f} ms  {a.error or ''}"
        )
    if found.next_cursor:
        click.echo(f"more: --cursor {found.next_cursor}", err=True)
