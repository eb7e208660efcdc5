"""Page access tokens: from the environment, else from a Prefect Secret block.

A token is resolved where it is used (inside a task run), so it never becomes a flow or task
parameter, an artifact or a log line."""

from prefect.blocks.system import Secret

from pagecast.errors import MissingPageToken
from pagecast.settings import page_token_from_env


def secret_block_name(page_id: str) -> str:
    """The Secret block that holds a page's token."""
    return f"pagecast-page-token-{page_id}"


def page_token(page_id: str) -> str:
    """The page's token: ``PAGECAST_PAGE_ACCESS_TOKEN__<PAGE_ID>``, ``PAGECAST_PAGE_ACCESS_TOKEN``,
    or the Secret block ``pagecast-page-token-<page_id>``; ``MissingPageToken`` otherwise."""
    token = page_token_from_env(page_id)
    if token:
        return token
    try:
        secret = Secret.load(secret_block_name(page_id), _sync=True)
    except ValueError:
        raise MissingPageToken(page_id) from None
    return str(secret.get())
