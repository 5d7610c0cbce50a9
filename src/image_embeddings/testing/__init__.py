"""Test and demo helpers, apart from the product code (which never imports them): the local S3 server, the sample
photos and sales, a test picture."""
