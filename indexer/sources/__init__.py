"""Sources: readers that turn a folder, a file or a PACS into catalog items (cases, images, reports)."""
