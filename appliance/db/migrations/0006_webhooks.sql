-- Placeholder, replaced by its feature's tables in this change.
SELECT 1;
