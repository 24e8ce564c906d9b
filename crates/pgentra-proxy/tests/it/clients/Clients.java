// pgjdbc (Debian's libpostgresql-jdbc-java) through the proxy, with its default settings:
// plain DriverManager connections, or a HikariCP pool (libhikaricp-java).
//
// Usage: java Clients PORT USER CLIENTS ROUNDS plain|hikari
//
// Each of CLIENTS threads, ROUNDS times: a parameterized query (pgjdbc prepares it on the
// server from its fifth execution), and a transaction that inserts a row and counts its own.
// Prints "rows N" and "backends N"; exits 1 on the first failure.

import com.zaxxer.hikari.HikariConfig;
import com.zaxxer.hikari.HikariDataSource;
import java.sql.Connection;
import java.sql.DriverManager;
import java.sql.PreparedStatement;
import java.sql.ResultSet;
import java.sql.SQLException;
import java.sql.Statement;
import java.util.Set;
import java.util.concurrent.ConcurrentHashMap;
import java.util.concurrent.ConcurrentLinkedQueue;
import java.util.concurrent.atomic.AtomicInteger;

public class Clients {
    interface Connect {
        Connection get() throws SQLException;
    }

    public static void main(String[] args) throws Exception {
        String url = "jdbc:postgresql://127.0.0.1:" + args[0] + "/postgres?sslmode=disable";
        String user = args[1];
        int clients = Integer.parseInt(args[2]);
        int rounds = Integer.parseInt(args[3]);
        String mode = args[4];
        String table = "jdbc_" + mode + "_" + args[0];
        Connect connect;
        HikariDataSource pool = null;
        if (mode.equals("hikari")) {
            HikariConfig config = new HikariConfig();
            config.setJdbcUrl(url);
            config.setUsername(user);
            config.setMaximumPoolSize(clients);
            pool = new HikariDataSource(config);
            connect = pool::getConnection;
        } else {
            connect = () -> DriverManager.getConnection(url, user, "");
        }
        try (Connection setup = connect.get(); Statement statement = setup.createStatement()) {
            statement.execute("create table " + table + " (client int, round int)");
        }
        Set<Integer> backends = ConcurrentHashMap.newKeySet();
        ConcurrentLinkedQueue<String> failures = new ConcurrentLinkedQueue<>();
        AtomicInteger rows = new AtomicInteger();
        Thread[] threads = new Thread[clients];
        for (int n = 0; n < clients; n++) {
            final int client = n;
            threads[n] = new Thread(() -> {
                try (Connection conn = connect.get()) {
                    for (int round = 0; round < rounds; round++) {
                        try (PreparedStatement query =
                                conn.prepareStatement("select ?::int * 2, pg_backend_pid()")) {
                            query.setInt(1, client);
                            try (ResultSet result = query.executeQuery()) {
                                result.next();
                                if (result.getInt(1) != client * 2) {
                                    throw new IllegalStateException("wrong row " + result.getInt(1));
                                }
                                backends.add(result.getInt(2));
                            }
                        }
                        conn.setAutoCommit(false);
                        try (PreparedStatement insert =
                                conn.prepareStatement("insert into " + table + " values (?, ?)")) {
                            insert.setInt(1, client);
                            insert.setInt(2, round);
                            insert.executeUpdate();
                        }
                        try (PreparedStatement count = conn.prepareStatement(
                                "select count(*) from " + table + " where client = ?")) {
                            count.setInt(1, client);
                            try (ResultSet result = count.executeQuery()) {
                                result.next();
                                if (result.getInt(1) != round + 1) {
                                    throw new IllegalStateException("count " + result.getInt(1));
                                }
                            }
                        }
                        conn.commit();
                        conn.setAutoCommit(true);
                        rows.incrementAndGet();
                    }
                } catch (Exception error) {
                    failures.add("client " + client + ": " + error);
                }
            });
            threads[n].start();
        }
        for (Thread thread : threads) {
            thread.join();
        }
        if (pool != null) {
            pool.close();
        }
        System.out.println("rows " + rows.get());
        System.out.println("backends " + backends.size());
        for (String failure : failures) {
            System.out.println(failure);
        }
        System.exit(failures.isEmpty() ? 0 : 1);
    }
}
