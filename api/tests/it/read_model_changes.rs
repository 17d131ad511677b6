//! How changes reach the read model: planned while reads go on and swapped in, new and renamed
//! rows placed in each text order where Postgres puts them (never the whole order re-read for a
//! few rows), a drifted order repaired by reconciliation, and a panic while applying a change
//! leaving every later read answering. These tests drive a model of their own, kept by the same
//! sync task the api runs, so that they can hold or break a change while it is planned.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;

use api::metrics::Metrics;
use api::read_model::query::{ListQuery, SortColumn, SortOrder};
use api::read_model::{sync, ReadModel};
use api::scope::Scope;
use tokio_util::sync::CancellationToken;

use crate::helpers::{eventually, metric, TestApp};

/// A read model of `app`'s database, kept current by the sync task until the token is cancelled.
struct OwnModel {
    model: Arc<ReadModel>,
    metrics: Metrics,
    cancel: CancellationToken,
}

impl OwnModel {
    async fn start(app: &TestApp, reconcile_every: Duration) -> Self {
        let model = ReadModel::new();
        let metrics = Metrics::new();
        let cancel = CancellationToken::new();
        let settings = sync::SyncSettings::new(
            &app.args.database,
            reconcile_every,
            app.args.read_model_load_timeout,
        )
        .unwrap();
        tokio::spawn(sync::run(
            model.clone(),
            settings,
            metrics.clone(),
            cancel.clone(),
        ));
        eventually(Duration::from_secs(20), || async { model.is_loaded() }).await;
        Self {
            model,
            metrics,
            cancel,
        }
    }

    /// Every id in the model's order of `column` ascending.
    fn order(&self, column: SortColumn) -> Vec<i64> {
        let query = ListQuery {
            limit: i64::from(i32::MAX),
            offset: 0,
            sort: column,
            order: SortOrder::Asc,
            words: Vec::new(),
        };
        let page = self
            .model
            .page(Scope::All, &query, usize::MAX)
            .expect("the model is loaded")
            .expect("an unbounded search answers");
        page.chats.iter().map(|chat| i64::from(chat.id)).collect()
    }

    /// Waits until the model's order of every text column is Postgres' own.
    async fn settle(&self, app: &TestApp) {
        eventually(Duration::from_secs(20), || async {
            for column in TEXT_COLUMNS {
                if self.order(column) != postgres_order(app, column).await {
                    return false;
                }
            }
            true
        })
        .await;
    }
}

impl Drop for OwnModel {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

const TEXT_COLUMNS: [SortColumn; 5] = [
    SortColumn::Name,
    SortColumn::Url,
    SortColumn::MaxChatId,
    SortColumn::Department,
    SortColumn::Source,
];

async fn postgres_order(app: &TestApp, column: SortColumn) -> Vec<i64> {
    let sql = format!(
        "select id::bigint from chats order by {}, id",
        column.sql_name()
    );
    sqlx::query_scalar(&sql).fetch_all(&app.db).await.unwrap()
}

/// Rows with ties, NULLs, empty strings and mixed scripts in every text column.
async fn seed(app: &TestApp, n: i32) {
    sqlx::query(
        "insert into chats (name, url, max_chat_id, department, source) \
         select (array['Бета', 'alpha', 'Alpha', '', 'ёж', 'Ёж', 'beta'])[1 + g % 7], \
                'https://max.ru/' || (g % 5), \
                case when g % 3 = 0 then null else '-7000' || (g % 4) end, \
                (array['Мехмат', null, 'ВМК', '', null])[1 + g % 5], \
                (array['admin_panel', 'bot_registrar'])[1 + g % 2] \
         from generate_series(1, $1) g",
    )
    .bind(n)
    .execute(&app.db)
    .await
    .unwrap();
}

#[tokio::test]
async fn a_read_answers_while_a_large_change_set_is_being_planned() {
    let app = TestApp::spawn().await;
    seed(&app, 3000).await;
    let own = OwnModel::start(&app, Duration::from_secs(3600)).await;
    // The hook holds the first plan until the test lets it go.
    let (planning_tx, planning_rx) = mpsc::channel::<()>();
    let (release_tx, release_rx) = mpsc::channel::<()>();
    let (planning_tx, release_rx) = (Mutex::new(planning_tx), Mutex::new(release_rx));
    let held = AtomicBool::new(false);
    own.model.set_planning_hook(Some(Arc::new(move || {
        if !held.swap(true, Ordering::SeqCst) {
            let _ = planning_tx.lock().unwrap().send(());
            let _ = release_rx.lock().unwrap().recv();
        }
    })));
    sqlx::query("update chats set name = name || ' (архив)' where id % 3 = 0")
        .execute(&app.db)
        .await
        .unwrap();
    let planning_rx = Mutex::new(planning_rx);
    tokio::task::spawn_blocking(move || planning_rx.lock().unwrap().recv())
        .await
        .unwrap()
        .expect("the change set is being planned");
    // The plan is held: a read must answer now, from the model as it was. The deadline only
    // keeps a read that waits on the change from hanging the test.
    let model = own.model.clone();
    let read = tokio::task::spawn_blocking(move || model.n_chats() + own_order_len(&model, 0));
    let answered = tokio::time::timeout(Duration::from_secs(30), read).await;
    release_tx.send(()).unwrap();
    assert_eq!(
        answered
            .expect("a read answered while a change was planned")
            .unwrap(),
        6000
    );
    own.settle(&app).await;
    assert_eq!(own_order_len(&own.model, 1000), 3000);
}

/// The chats served in all, after checking that `archived` of them match "архив".
fn own_order_len(model: &ReadModel, archived: usize) -> usize {
    let query = ListQuery {
        limit: 100_000,
        offset: 0,
        sort: SortColumn::Name,
        order: SortOrder::Desc,
        words: vec!["архив".to_owned()],
    };
    let page = model
        .page(Scope::All, &query, usize::MAX)
        .expect("the model is loaded")
        .expect("an unbounded search answers");
    assert_eq!(page.total, archived);
    model
        .page(
            Scope::All,
            &ListQuery {
                words: Vec::new(),
                ..query
            },
            usize::MAX,
        )
        .expect("the model is loaded")
        .expect("an unbounded search answers")
        .total
}

#[tokio::test]
async fn inserts_and_renames_land_where_postgres_orders_them_without_re_reading_an_order() {
    let app = TestApp::spawn().await;
    seed(&app, 400).await;
    let own = OwnModel::start(&app, Duration::from_secs(3600)).await;
    own.settle(&app).await;
    for sql in [
        // Ties with existing rows, NULLs in every nullable column, a new first and last row.
        "insert into chats (name, url, max_chat_id, department, source) values \
         ('alpha', 'https://max.ru/1', null, null, 'admin_panel')",
        "insert into chats (name, url, max_chat_id, department, source) values \
         ('', '', '', '', 'academic_group'), ('ёж', 'https://max.ru/9', '-70001', null, 'academic_group'), \
         ('Бета', 'https://max.ru/0', null, 'Мехмат', 'bot_registrar')",
        "insert into chats (name, url, max_chat_id, department, source) \
         select 'alpha', 'https://max.ru/3', null, null, 'admin_panel' from generate_series(1, 5)",
        // Renames into a tie, to NULL, and out of NULL.
        "update chats set name = 'Alpha', department = null where id in (7, 8)",
        "update chats set max_chat_id = '-7000' || id, department = 'ВМК' where id in (3, 30)",
        "delete from chats where id in (5, 6)",
    ] {
        sqlx::query(sql).execute(&app.db).await.unwrap();
        own.settle(&app).await;
    }
    let metrics = own.metrics.render();
    assert!(
        metric(
            &metrics,
            "participants_read_model_order_loads_total{how=\"placed\"}"
        ) >= 5.0,
        "rows were placed one by one"
    );
    assert_eq!(
        metric(
            &metrics,
            "participants_read_model_order_loads_total{how=\"whole\"}"
        ),
        0.0,
        "no whole order was re-read for a few rows"
    );
}

#[tokio::test]
async fn a_drifted_sort_order_is_repaired_by_reconciliation() {
    let app = TestApp::spawn().await;
    seed(&app, 200).await;
    let own = OwnModel::start(&app, Duration::from_secs(1)).await;
    own.settle(&app).await;
    // As a rename-and-back racing another batch's order fetch would leave it: rows and
    // versions all current, the order wrong.
    own.model.drift_text_order(SortColumn::Department);
    assert_ne!(
        own.order(SortColumn::Department),
        postgres_order(&app, SortColumn::Department).await
    );
    own.settle(&app).await;
    let metrics = own.metrics.render();
    assert_eq!(
        metric(&metrics, "participants_read_model_order_repairs_total"),
        1.0
    );
    assert!(
        metric(
            &metrics,
            "participants_read_model_order_checks_total{outcome=\"compared\"}"
        ) >= 1.0
    );
}

/// A row committed between the model's digest and Postgres' is not drift: the orders are
/// compared only in a snapshot the model holds row for row, so a steady stream of inserts
/// never makes reconciliation re-read a whole order (at 1,500,000 chats each re-read takes
/// seconds, during which notifications wait, and a re-read racing the inserts put them last).
#[tokio::test]
async fn rows_changing_under_reconciliation_are_not_taken_for_a_drifted_order() {
    let app = TestApp::spawn().await;
    seed(&app, 300).await;
    let own = OwnModel::start(&app, Duration::from_millis(100)).await;
    own.settle(&app).await;
    let started = std::time::Instant::now();
    let mut inserted = 0;
    while started.elapsed() < Duration::from_secs(6) {
        sqlx::query(
            "insert into chats (name, url, max_chat_id, department, source) \
             values ('Новый ' || $1, 'https://max.ru/new/' || $1, '-71' || $1, 'ВМК', 'admin_panel')",
        )
        .bind(inserted)
        .execute(&app.db)
        .await
        .unwrap();
        inserted += 1;
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    own.settle(&app).await;
    let metrics = own.metrics.render();
    assert_eq!(
        metric(&metrics, "participants_read_model_order_repairs_total"),
        0.0,
        "{inserted} inserts were taken for drift"
    );
    // Reconciliation ran while the rows changed, and left the orders for a quieter round.
    assert!(
        metric(
            &metrics,
            "participants_read_model_order_checks_total{outcome=\"skipped\"}"
        ) >= 1.0
    );
}

#[tokio::test]
async fn a_panic_while_applying_a_change_leaves_every_later_read_answering() {
    let app = TestApp::spawn().await;
    seed(&app, 100).await;
    let own = OwnModel::start(&app, Duration::from_secs(1)).await;
    let panicked = Arc::new(AtomicBool::new(false));
    own.model.set_planning_hook(Some(Arc::new({
        let panicked = panicked.clone();
        move || {
            if !panicked.swap(true, Ordering::SeqCst) {
                panic!("a change set that cannot be planned");
            }
        }
    })));
    sqlx::query("update chats set name = 'after the panic' where id = 1")
        .execute(&app.db)
        .await
        .unwrap();
    eventually(Duration::from_secs(20), || async {
        panicked.load(Ordering::SeqCst)
    })
    .await;
    // Reads answer at once, and the sync task lives on: the change lands after all.
    assert_eq!(own.model.n_chats(), 100);
    eventually(Duration::from_secs(20), || async {
        own.model.get(Scope::All, 1).flatten().map(|chat| chat.name)
            == Some("after the panic".to_owned())
    })
    .await;
    own.settle(&app).await;
    assert!(
        metric(
            &own.metrics.render(),
            "participants_read_model_sync_failures_total"
        ) >= 1.0
    );
}
