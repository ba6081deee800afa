//! The daemon's enums and the migrations' checks allow the same texts: a
//! value the daemon writes is accepted, and a value a column holds parses.

mod support;

use std::collections::BTreeSet;

use connectord::vocabulary::COLUMNS;
use support::TestDb;

/// The quoted literals of a constraint's definition, such as
/// `CHECK ((VALUE = ANY (ARRAY['running'::text, 'failed'::text])))`.
fn literals(definition: &str) -> impl Iterator<Item = &str> {
    definition.split('\'').skip(1).step_by(2)
}

#[tokio::test]
async fn every_enum_spells_its_column_as_the_schema_allows() {
    let db = TestDb::new().await;
    for &(table, column, texts) in COLUMNS {
        // A column's check is on the table, or on its domain's type.
        let definitions: Vec<String> = sqlx::query_scalar(
            "select pg_get_constraintdef(c.oid)
             from pg_attribute a
             join pg_constraint c
               on c.contype = 'c'
              and ((c.conrelid = a.attrelid and a.attnum = any(c.conkey)) or c.contypid = a.atttypid)
             where a.attrelid = $1::regclass and a.attname = $2",
        )
        .bind(table)
        .bind(column)
        .fetch_all(&db.pool)
        .await
        .expect("read the column's checks");
        assert_eq!(
            definitions.len(),
            1,
            "{table}.{column} should have exactly one check: {definitions:?}"
        );
        let allowed: BTreeSet<&str> = literals(&definitions[0]).collect();
        let declared: BTreeSet<&str> = texts.iter().copied().collect();
        assert_eq!(
            allowed, declared,
            "{table}.{column}: the schema allows {allowed:?}, the enum declares {declared:?}"
        );
    }
}
