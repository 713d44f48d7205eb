set terminal pngcairo size 820,480 font 'sans,11'
set output 'iops_by_qd.png'
set multiplot layout 1,1 title 'IOPS by queue depth (median of rounds, bars min–max; higher is better)' font 'sans,14'
set logscale x 2
set xtics (1,2,4,8,16,32,64)
set xrange [0.7:48]
set offsets 0,0,graph 0.2,0
set grid
set key outside right top
set xlabel 'queue depth (iodepth)'
set ylabel 'IOPS'
set yrange [0:*]
set format y '%.0s%c'
set title 'paging'
plot 'paging.dat' index 0 using ($1*0.9202):($2/1):($3/1):($4/1) with yerrorlines lw 2 pt 7 ps 1.1 lc rgb '#ff7f0e' dt 1 title 'lupool-file', \
     'paging.dat' index 1 using ($1*0.9727):($2/1):($3/1):($4/1) with yerrorlines lw 2 pt 7 ps 1.1 lc rgb '#ffbb78' dt 2 title 'base-lupool-file', \
     'paging.dat' index 2 using ($1*1.0281):($2/1):($3/1):($4/1) with yerrorlines lw 2 pt 7 ps 1.1 lc rgb '#d62728' dt 1 title 'lupool-mem', \
     'paging.dat' index 3 using ($1*1.0867):($2/1):($3/1):($4/1) with yerrorlines lw 2 pt 7 ps 1.1 lc rgb '#f7b6d2' dt 2 title 'base-lupool-mem'
unset multiplot
