"""The API gateway: the one door for storefront clients.

routes.py     the route table: path prefix -> service, access policy and affinity key per route
upstreams.py  upstream instances, the consistent-hash ring, active health checks, circuit breakers
client.py     a lean HTTP/1.1 client for the upstream hop: keep-alive pools on asyncio protocols
proxy.py      the proxy policy (token check, rate limit, pick, forward, retry) and aiohttp's handler for it
front.py      the public port's lean HTTP/1.1 front: proxies itself, hands everything else to aiohttp
ratelimit.py  per-client token buckets, in memory or shared through Redis
edge.py       CORS and the access log
docs.py       one OpenAPI document merged from the services' documents
metrics.py    gateway gauges and counters exported at /metrics
options.py    gateway settings (timeouts, limits, CORS, Redis) from ``ECOM_GATEWAY_*``
service.py    ``create_app(settings)``
"""
