"""Car parks: capacity, time zone and tariff."""
