#ifndef CLEDGER_H
#define CLEDGER_H
#include <sqlite3.h>

/* sqlite3_db_config is variadic, which Swift cannot call: this sets one of its flags. The ledger
   turns off the checkpoint SQLite runs when its last connection closes (two fsyncs at the end of
   every `mvm` command); the log is checkpointed as it grows instead. */
static inline int mvm_sqlite_skip_checkpoint_on_close(sqlite3 *db) {
    return sqlite3_db_config(db, SQLITE_DBCONFIG_NO_CKPT_ON_CLOSE, 1, (int *)0);
}

#endif
