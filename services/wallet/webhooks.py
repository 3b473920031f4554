"""The wallet's Stripe webhook endpoint, `POST /stripe/webhook`.

The HTTP server itself is shared with the merchant service and lives in
`libs.stripe_webhooks` (statuses, limits and load shedding are documented there). Each
delivery's raw body and Stripe-Signature header go to `TopUps.handle_webhook`, which verifies
the signature with `stripe_gateway.StripeGateway.verify_event` before anything is parsed.
"""

from __future__ import annotations

from libs.stripe_webhooks import CONNECTIONS_PER_SLOT, WEBHOOK_PATH, Handler, WebhookResponse, WebhookServer

__all__ = ["CONNECTIONS_PER_SLOT", "WEBHOOK_PATH", "Handler", "WebhookResponse", "WebhookServer"]
