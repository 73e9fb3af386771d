"""Cart service: one CartActor per customer's cart, priced by the catalog, checked out to the order service."""
