"""Fleet learning: devices learn from each other's weights, never their data, through Flower.

`wire` is what a device's daemon and the fleet's Flower apps exchange (no Flower needed);
`client` (the ClientApp each device's SuperNode runs) and `server` (the ServerApp) import `flwr`,
the optional extra `pip install -e '.[fleet]'`.
"""
