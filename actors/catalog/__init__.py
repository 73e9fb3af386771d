"""Catalog service: products, brands, types; ProductActor owns every write of stock and price.

``messages`` is the contract other services import (ReserveStock/ReleaseStock/CommitReservation in,
StockReserved/StockRejected out, ProductPriceChanged/ProductLowStock/ProductDeleted published).
"""
