"""Where the raw data comes from: downloads checked by checksum, the local mirror, the IMDb scraper, and reading
untrusted pickles safely."""
