"""
The C{twist marketplace-ws} plugin. It imports nothing heavy, so C{twist --help}
stays fast: the service maker is loaded only when the plugin is run.
"""

from twisted.application.service import ServiceMaker

marketplace_ws = ServiceMaker(
    "marketplace-ws",
    "marketplace_ws.tap",
    "Real-time WebSocket server for a Next.js marketplace.",
    "marketplace-ws",
)
