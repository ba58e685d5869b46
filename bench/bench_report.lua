-- Shared by the bench_*.lua scripts (each dofile()s it last): at the end, one line "RESULT {json}"
-- with what bench/bench.py and tests/support.py run_wrk() read (latencies in microseconds; errors as
-- wrk counts them: sockets, and any status of 400 and over). A script may define extra_report()
-- for more fields.
function done(summary, latency, requests)
    local fields = {
        string.format('"requests": %d', summary.requests),
        string.format('"duration_us": %d', summary.duration),
        string.format('"p50_us": %d', latency:percentile(50)),
        string.format('"p90_us": %d', latency:percentile(90)),
        string.format('"p99_us": %d', latency:percentile(99)),
        string.format('"max_us": %d', latency.max),
        string.format('"errors_connect": %d', summary.errors.connect),
        string.format('"errors_read": %d', summary.errors.read),
        string.format('"errors_write": %d', summary.errors.write),
        string.format('"errors_status": %d', summary.errors.status),
        string.format('"errors_timeout": %d', summary.errors.timeout),
    }
    if extra_report then
        for key, value in pairs(extra_report()) do
            fields[#fields + 1] = string.format('"%s": %d', key, value)
        end
    end
    io.write("RESULT {" .. table.concat(fields, ", ") .. "}\n")
end
